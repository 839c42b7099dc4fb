//! Debian's liblime (the real LIME client, C API `lime/lime_ffi.h`, liblime 5.1)
//! driven from Rust, with its X3DH traffic sent to a test server over HTTPS.
//!
//! liblime does no networking: it hands every X3DH request to a post callback and
//! waits for `lime_ffi_processX3DHServerResponse`. The callback here only queues
//! the request; after each lime call, [`LimeManager`] posts what was queued and
//! feeds each answer back, until nothing is left to post. Answering from inside
//! the callback would re-enter liblime, which deadlocks on its error paths.
//!
//! - [`LimeManager`]: one liblime manager (its own sqlite file), the post queue and
//!   the log of what was exchanged with the server.
//! - [`LimeDevice`]: one local user (a device, named by its GRUU) on its own manager.
//! - [`X3dhInit`]: the X3DH init a Double Ratchet message may carry, read from its bytes.
//!
//! This is the only place in the project with `unsafe`: FFI into liblime.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use lime_protocol::{Curve, RequestMessage, Response, ResponseMessage};
use lime_server::client::LimeClient;

mod dr_message;
mod ffi;

// Not every test binary that compiles the harness reads DR messages.
#[allow(unused_imports)]
pub use dr_message::X3dhInit;

/// More posts than any single lime operation makes: past it, liblime is looping.
const MAX_POSTS_PER_OPERATION: usize = 32;

/// Added to a create-user failure: the usual cause on a fresh machine.
const INTERNAL_ERROR_HINT: &str = " (liblime logs the cause on stderr; \"Failed to find shared \
     library for backend sqlite3\" means the SOCI sqlite3 backend is missing: \
     apt-get install libsoci-sqlite3-4.0)";

/// How liblime encrypts a message (`lime_ffi_EncryptionPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncryptionPolicy {
    /// The plaintext is inside each recipient's Double Ratchet message.
    DrMessage = 0,
    /// The plaintext is in one cipher message; each DR message carries its key.
    CipherMessage = 1,
}

/// What liblime says of a peer device after encrypt or decrypt
/// (`lime_ffi_PeerDeviceStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerDeviceStatus {
    /// Known, identity not confirmed.
    Untrusted,
    /// Known, identity confirmed.
    Trusted,
    /// Flagged unsafe by the user.
    Unsafe,
    /// Could not encrypt to it (no key bundle) or could not decrypt.
    Fail,
    /// First exchange with this device.
    Unknown,
}

impl PeerDeviceStatus {
    fn from_ffi(value: c_int) -> PeerDeviceStatus {
        match value {
            0 => PeerDeviceStatus::Untrusted,
            1 => PeerDeviceStatus::Trusted,
            2 => PeerDeviceStatus::Unsafe,
            4 => PeerDeviceStatus::Unknown,
            _ => PeerDeviceStatus::Fail,
        }
    }
}

/// The id liblime uses for a curve (`lime_ffi_CurveId`); liblime 5.1 has only two.
fn lime_curve_id(curve: Curve) -> Result<c_int> {
    match curve {
        Curve::C25519 => Ok(1),
        Curve::C448 => Ok(2),
        other => bail!("liblime 5.1 has no {other} (only c25519 and c448)"),
    }
}

/// One request liblime made and what the server answered.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The X3DH request bytes liblime posted.
    pub request: Vec<u8>,
    /// HTTP status; 0 when the post failed before any answer.
    pub status: u16,
    /// The answer body.
    pub response: Vec<u8>,
    /// Why the post failed, when it did.
    pub transport_error: Option<String>,
}

impl Exchange {
    /// The answer parsed as an X3DH message, if it was a 200 that parses.
    pub fn answer(&self) -> Option<ResponseMessage> {
        match self.status {
            200 => ResponseMessage::parse(&self.response).ok(),
            _ => None,
        }
    }

    /// The protocol name of the request (`registerUser`, `getPeerBundle`, ...).
    pub fn request_name(&self) -> String {
        match RequestMessage::parse(&self.request) {
            Ok(message) => message.request.message_type().name().to_owned(),
            Err(error) => format!("unparsable request ({error})"),
        }
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} bytes) -> ",
            self.request_name(),
            self.request.len()
        )?;
        if let Some(error) = &self.transport_error {
            return write!(f, "no answer: {error}");
        }
        write!(f, "HTTP {}", self.status)?;
        if self.status != 200 {
            return write!(f, ", body {:02x?}", self.response);
        }
        match ResponseMessage::parse(&self.response) {
            Ok(answer) => write!(f, ", {}", describe_answer(&answer)),
            Err(error) => write!(
                f,
                ", unparsable answer ({error}): {:02x?}",
                &self.response[..self.response.len().min(64)]
            ),
        }
    }
}

/// A one-line account of an X3DH answer for failure messages.
fn describe_answer(answer: &ResponseMessage) -> String {
    let curve = answer.curve_byte;
    match &answer.response {
        Response::Done(kind) => format!("{kind} done (curve {curve})"),
        Response::PeerBundles(bundles) => {
            let flags: Vec<String> = bundles
                .iter()
                .map(|bundle| format!("{} flag {}", bundle.device_id, bundle.flag()))
                .collect();
            format!("peerBundle (curve {curve}) [{}]", flags.join(", "))
        }
        Response::SelfOneTimePreKeys(ids) => {
            format!("selfOPks (curve {curve}) with {} ids", ids.len())
        }
        Response::Error(error) => {
            format!("error {:?} (curve {curve}) {:?}", error.code, error.text)
        }
    }
}

/// Lists exchanges one per line, for failure messages.
pub fn describe_exchanges(exchanges: &[Exchange]) -> String {
    if exchanges.is_empty() {
        return "no request was posted".to_owned();
    }
    exchanges
        .iter()
        .enumerate()
        .map(|(index, exchange)| format!("  {}. {exchange}", index + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A post liblime asked for and that has not been answered yet.
struct PendingPost {
    /// liblime's handle, to give back exactly once with the answer.
    lime_data: ffi::LimeFfiDataT,
    url: String,
    from: String,
    body: Vec<u8>,
}

/// A status callback call: success or not, and liblime's message.
#[derive(Clone, Debug)]
struct StatusReport {
    success: bool,
    message: String,
}

/// What the C callbacks write to. Held in an `Rc` by [`LimeManager`], so that the
/// address given to liblime stays valid and fixed as long as the manager lives,
/// and is only ever shared.
#[derive(Default)]
struct CallbackState {
    posts: RefCell<VecDeque<PendingPost>>,
    reports: RefCell<Vec<StatusReport>>,
}

/// Reads a C string liblime passed to a callback; empty for a null pointer.
///
/// # Safety
/// `text` is null or a valid NUL-terminated string for the duration of the call.
unsafe fn c_text(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// liblime's X3DH post callback: queues the request, answers nothing.
extern "C" fn queue_post(
    user_data: *mut c_void,
    lime_data: ffi::LimeFfiDataT,
    url: *const c_char,
    from: *const c_char,
    message: *const u8,
    message_size: usize,
) {
    // SAFETY: `user_data` is the `CallbackState` registered in `LimeManager::new`,
    // alive as long as the manager; liblime's strings and buffer are valid during
    // this call and copied before it returns.
    let (state, url, from, body) = unsafe {
        let body = if message.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(message, message_size).to_vec()
        };
        (
            &*(user_data as *const CallbackState),
            c_text(url),
            c_text(from),
            body,
        )
    };
    state.posts.borrow_mut().push_back(PendingPost {
        lime_data,
        url,
        from,
        body,
    });
}

/// liblime's status callback: records the outcome of an operation.
extern "C" fn record_status(user_data: *mut c_void, status: c_int, message: *const c_char) {
    // SAFETY: `user_data` is the manager's `CallbackState` (see `queue_post`);
    // `message` is a NUL-terminated string valid during this call.
    let (state, message) = unsafe { (&*(user_data as *const CallbackState), c_text(message)) };
    state.reports.borrow_mut().push(StatusReport {
        success: status == ffi::CALLBACK_SUCCESS,
        message,
    });
}

fn c_string(text: &str) -> Result<CString> {
    CString::new(text).with_context(|| format!("{text:?} contains a NUL byte"))
}

/// One liblime manager with its own sqlite file, talking to the server through
/// `client`. Keep it on one task: liblime is not thread-safe.
pub struct LimeManager {
    raw: ffi::LimeManagerT,
    state: Rc<CallbackState>,
    client: LimeClient,
    /// Every exchange with the server so far, oldest first.
    exchanges: Vec<Exchange>,
    /// Where the current operation's exchanges start in `exchanges`.
    operation_start: usize,
}

impl LimeManager {
    /// Opens (or creates) the liblime database `db` and uses `client` for its posts.
    pub fn new(db: &Path, client: LimeClient) -> Result<LimeManager> {
        let db_name = db
            .to_str()
            .with_context(|| format!("database path {} is not UTF-8", db.display()))?;
        let db_name = c_string(db_name)?;
        let state = Rc::new(CallbackState::default());
        let mut raw: ffi::LimeManagerT = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer, `db_name` a NUL-terminated string
        // that liblime copies; `state` outlives the manager (destroyed first in
        // `Drop`), and `queue_post` matches `lime_ffi_X3DHServerPostData`.
        let code = unsafe {
            ffi::lime_ffi_manager_init(
                &mut raw,
                db_name.as_ptr(),
                queue_post,
                Rc::as_ptr(&state) as *mut c_void,
            )
        };
        ensure!(
            code == ffi::SUCCESS && !raw.is_null(),
            "lime_ffi_manager_init({}) returned {code}",
            db.display()
        );
        Ok(LimeManager {
            raw,
            state,
            client,
            exchanges: Vec::new(),
            operation_start: 0,
        })
    }

    /// Every exchange with the server so far, oldest first.
    pub fn exchanges(&self) -> &[Exchange] {
        &self.exchanges
    }

    /// The exchanges of the last operation that talked to the server.
    pub fn last_operation_exchanges(&self) -> &[Exchange] {
        &self.exchanges[self.operation_start..]
    }

    /// The pointer liblime passes back to `record_status`.
    fn callback_data(&self) -> *mut c_void {
        Rc::as_ptr(&self.state) as *mut c_void
    }

    /// Starts an operation: forgets earlier status reports.
    fn begin_operation(&mut self) {
        self.state.reports.borrow_mut().clear();
        self.operation_start = self.exchanges.len();
    }

    /// Posts everything liblime queued, answering each post exactly once, until the
    /// queue stays empty; then checks that the operation reported success once.
    async fn finish_operation(&mut self, operation: &str) -> Result<()> {
        let mut posted = 0;
        loop {
            let next = self.state.posts.borrow_mut().pop_front();
            let Some(post) = next else { break };
            posted += 1;
            if posted > MAX_POSTS_PER_OPERATION {
                // liblime is looping. Answer what it queued as network failures, so
                // that it frees its handles and lets go of the caller's buffers.
                let error = "not posted: too many requests".to_owned();
                self.answer(post, 0, Vec::new(), Some(error));
                if posted > 2 * MAX_POSTS_PER_OPERATION {
                    break;
                }
                continue;
            }
            let headers = [
                ("Content-Type", "x3dh/octet-stream"),
                ("From", post.from.as_str()),
            ];
            let answer = self
                .client
                .post(&post.url, &headers, post.body.clone())
                .await;
            match answer {
                Ok(answer) => self.answer(post, answer.status, answer.body.to_vec(), None),
                Err(error) => self.answer(post, 0, Vec::new(), Some(format!("{error:#}"))),
            }
        }
        let reports = self.state.reports.borrow().clone();
        let exchanges = describe_exchanges(self.last_operation_exchanges());
        ensure!(
            posted <= MAX_POSTS_PER_OPERATION,
            "{operation}: liblime posted more than {MAX_POSTS_PER_OPERATION} requests:\n{exchanges}"
        );
        match reports.as_slice() {
            [report] if report.success => Ok(()),
            [] => bail!("{operation}: liblime never reported an outcome; exchanges:\n{exchanges}"),
            _ => bail!("{operation}: liblime reported {reports:?}; exchanges:\n{exchanges}"),
        }
    }

    /// Gives one answer back to liblime (which frees `post.lime_data`) and logs it.
    fn answer(
        &mut self,
        post: PendingPost,
        status: u16,
        body: Vec<u8>,
        transport_error: Option<String>,
    ) {
        // SAFETY: `post.lime_data` came from `queue_post` and was popped from the
        // queue, so it is answered here exactly once; `body` is valid for the call.
        let code = unsafe {
            ffi::lime_ffi_processX3DHServerResponse(
                post.lime_data,
                c_int::from(status),
                body.as_ptr(),
                body.len(),
            )
        };
        let transport_error = match (transport_error, code) {
            (error, ffi::SUCCESS) => error,
            (error, code) => Some(format!(
                "{}lime_ffi_processX3DHServerResponse returned {code}",
                error.map(|error| format!("{error}; ")).unwrap_or_default()
            )),
        };
        self.exchanges.push(Exchange {
            request: post.body,
            status,
            response: body,
            transport_error,
        });
    }

    /// Whether `device_id` is an active local user of this manager.
    pub fn is_user(&self, device_id: &str) -> Result<bool> {
        let device_id = c_string(device_id)?;
        // SAFETY: `self.raw` is a live manager, `device_id` NUL-terminated.
        let code = unsafe { ffi::lime_ffi_is_user(self.raw, device_id.as_ptr()) };
        match code {
            ffi::SUCCESS => Ok(true),
            ffi::USER_NOT_FOUND => Ok(false),
            other => bail!("lime_ffi_is_user returned {other}"),
        }
    }

    /// Forgets peer device `device_id` in the local storage (its identity key and
    /// every session with it), for all local users: the next encryption to it
    /// fetches its key bundle again. Nothing is posted; unknown devices are ignored.
    pub fn delete_peer_device(&mut self, device_id: &str) -> Result<()> {
        let device = c_string(device_id)?;
        // SAFETY: `self.raw` is a live manager, `device` NUL-terminated and only read
        // during the call.
        let code = unsafe { ffi::lime_ffi_delete_peerDevice(self.raw, device.as_ptr()) };
        ensure!(
            code == ffi::SUCCESS,
            "lime_ffi_delete_peerDevice({device_id}) returned {code}"
        );
        Ok(())
    }

    /// Creates a local user and registers it on the server at `server_url`.
    pub async fn create_user(
        &mut self,
        device_id: &str,
        server_url: &str,
        curve: Curve,
        opk_initial_batch: u16,
    ) -> Result<()> {
        let operation = format!("create user {device_id} ({curve})");
        let curve_id = lime_curve_id(curve)?;
        let (device, url) = (c_string(device_id)?, c_string(server_url)?);
        self.begin_operation();
        // SAFETY: live manager, NUL-terminated strings liblime copies, callback data
        // valid as long as the manager.
        let code = unsafe {
            ffi::lime_ffi_create_user(
                self.raw,
                device.as_ptr(),
                url.as_ptr(),
                curve_id,
                opk_initial_batch,
                record_status,
                self.callback_data(),
            )
        };
        ensure!(
            code == ffi::SUCCESS,
            "{operation}: lime_ffi_create_user returned {code}{}",
            if code == ffi::INTERNAL_ERROR {
                INTERNAL_ERROR_HINT
            } else {
                ""
            }
        );
        self.finish_operation(&operation).await
    }

    /// Deletes a local user and its device on the server.
    pub async fn delete_user(&mut self, device_id: &str) -> Result<()> {
        let operation = format!("delete user {device_id}");
        let device = c_string(device_id)?;
        self.begin_operation();
        // SAFETY: live manager, NUL-terminated string, callback data as above.
        let code = unsafe {
            ffi::lime_ffi_delete_user(
                self.raw,
                device.as_ptr(),
                record_status,
                self.callback_data(),
            )
        };
        ensure!(
            code == ffi::SUCCESS,
            "{operation}: lime_ffi_delete_user returned {code}"
        );
        self.finish_operation(&operation).await
    }

    /// Runs liblime's periodic update for all local users: SPk renewal when due,
    /// and an OPk batch of `opk_batch_size` when fewer than `opk_server_low_limit`
    /// are left on the server.
    pub async fn update(&mut self, opk_server_low_limit: u16, opk_batch_size: u16) -> Result<()> {
        let operation =
            format!("update (OPk low limit {opk_server_low_limit}, batch {opk_batch_size})");
        self.begin_operation();
        // SAFETY: live manager, callback data as above.
        let code = unsafe {
            ffi::lime_ffi_update(
                self.raw,
                record_status,
                self.callback_data(),
                opk_server_low_limit,
                opk_batch_size,
            )
        };
        ensure!(
            code == ffi::SUCCESS,
            "{operation}: lime_ffi_update returned {code}"
        );
        self.finish_operation(&operation).await
    }

    /// The public identity key (EdDSA) of local user `device_id`.
    pub fn self_identity_key(&self, device_id: &str) -> Result<Vec<u8>> {
        let device = c_string(device_id)?;
        let mut key = vec![0u8; 64];
        let mut size = key.len();
        // SAFETY: live manager, NUL-terminated string, `key` writable for `size` bytes.
        let code = unsafe {
            ffi::lime_ffi_get_selfIdentityKey(
                self.raw,
                device.as_ptr(),
                key.as_mut_ptr(),
                &mut size,
            )
        };
        ensure!(
            code == ffi::SUCCESS,
            "lime_ffi_get_selfIdentityKey({device_id}) returned {code}"
        );
        key.truncate(size);
        Ok(key)
    }

    /// Encrypts `plaintext` from local user `sender` to the devices `recipients`,
    /// fetching key bundles from the server for devices it has no session with.
    pub async fn encrypt(
        &mut self,
        sender: &str,
        curve: Curve,
        recipient_user_id: &str,
        recipients: &[&str],
        plaintext: &[u8],
        policy: EncryptionPolicy,
    ) -> Result<Encrypted> {
        let operation = format!("encrypt from {sender} to {recipients:?} ({recipient_user_id})");
        let curve_id = lime_curve_id(curve)?;
        let (mut dr_message_max, mut cipher_message_max) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid.
        let code = unsafe {
            ffi::lime_ffi_encryptOutBuffersMaximumSize(
                plaintext.len(),
                curve_id,
                &mut dr_message_max,
                &mut cipher_message_max,
            )
        };
        ensure!(
            code == ffi::SUCCESS,
            "lime_ffi_encryptOutBuffersMaximumSize returned {code}"
        );

        // liblime writes into these buffers when the operation completes, which may
        // be after `lime_ffi_encrypt` returns (once the bundles are in): they live on
        // the heap, untouched, until `finish_operation` is done.
        let sender_c = c_string(sender)?;
        let recipient_user_c = c_string(recipient_user_id)?;
        let device_ids = recipients
            .iter()
            .map(|device| c_string(device))
            .collect::<Result<Vec<_>>>()?;
        let mut dr_messages: Vec<Vec<u8>> = vec![vec![0u8; dr_message_max]; recipients.len()];
        let mut recipient_data: Vec<ffi::RecipientData> = device_ids
            .iter()
            .zip(dr_messages.iter_mut())
            .map(|(device, buffer)| ffi::RecipientData {
                device_id: device.as_ptr() as *mut c_char,
                // Anything but `fail` (3) asks liblime to encrypt to this device.
                peer_status: 4,
                dr_message: buffer.as_mut_ptr(),
                dr_message_size: buffer.len(),
            })
            .collect();
        let mut cipher_message = vec![0u8; cipher_message_max];
        let mut cipher_message_size = Box::new(cipher_message.len());

        self.begin_operation();
        // SAFETY: live manager; strings NUL-terminated; `recipient_data` describes
        // `recipients.len()` entries whose buffers are writable for their sizes;
        // all of them and `cipher_message(_size)` stay alive and unmoved until
        // `finish_operation` returns, after which liblime no longer holds them.
        let code = unsafe {
            ffi::lime_ffi_encrypt(
                self.raw,
                sender_c.as_ptr(),
                recipient_user_c.as_ptr(),
                recipient_data.as_mut_ptr(),
                recipient_data.len(),
                plaintext.as_ptr(),
                plaintext.len(),
                cipher_message.as_mut_ptr(),
                &mut *cipher_message_size,
                record_status,
                self.callback_data(),
                policy as c_int,
            )
        };
        ensure!(
            code == ffi::SUCCESS,
            "{operation}: lime_ffi_encrypt returned {code}"
        );
        self.finish_operation(&operation).await?;

        cipher_message.truncate(*cipher_message_size);
        let messages = recipient_data
            .iter()
            .zip(dr_messages)
            .zip(recipients)
            .map(|((data, mut buffer), device)| {
                buffer.truncate(data.dr_message_size);
                RecipientMessage {
                    device_id: (*device).to_owned(),
                    status: PeerDeviceStatus::from_ffi(data.peer_status),
                    dr_message: buffer,
                }
            })
            .collect();
        Ok(Encrypted {
            cipher_message,
            messages,
        })
    }

    /// Decrypts a message that `sender` sent to local user `recipient` for
    /// `recipient_user_id`; fails when liblime cannot decrypt it.
    pub fn decrypt(
        &mut self,
        recipient: &str,
        recipient_user_id: &str,
        sender: &str,
        dr_message: &[u8],
        cipher_message: &[u8],
    ) -> Result<Decrypted> {
        let (recipient_c, user_c, sender_c) = (
            c_string(recipient)?,
            c_string(recipient_user_id)?,
            c_string(sender)?,
        );
        // lime_ffi.h: the plaintext is never longer than the larger input.
        let mut plaintext = vec![0u8; dr_message.len().max(cipher_message.len())];
        let mut plaintext_size = plaintext.len();
        let cipher_ptr = match cipher_message {
            [] => std::ptr::null(),
            bytes => bytes.as_ptr(),
        };
        // SAFETY: live manager; strings NUL-terminated; input buffers valid for their
        // lengths (null with length 0 for no cipher message); `plaintext` writable for
        // `plaintext_size` bytes. Decryption never posts anything.
        let status = unsafe {
            ffi::lime_ffi_decrypt(
                self.raw,
                recipient_c.as_ptr(),
                user_c.as_ptr(),
                sender_c.as_ptr(),
                dr_message.as_ptr(),
                dr_message.len(),
                cipher_ptr,
                cipher_message.len(),
                plaintext.as_mut_ptr(),
                &mut plaintext_size,
            )
        };
        let status = PeerDeviceStatus::from_ffi(status);
        if status == PeerDeviceStatus::Fail {
            return Err(anyhow!(
                "{recipient} could not decrypt the message from {sender} ({} byte DR message, {} byte cipher message)",
                dr_message.len(),
                cipher_message.len()
            ));
        }
        plaintext.truncate(plaintext_size);
        Ok(Decrypted {
            plaintext,
            sender_status: status,
        })
    }
}

impl Drop for LimeManager {
    fn drop(&mut self) {
        // A test that failed mid-operation may leave posts unanswered: answer them
        // as network failures so liblime frees its handles, then destroy the manager.
        for _ in 0..MAX_POSTS_PER_OPERATION {
            let next = self.state.posts.borrow_mut().pop_front();
            let Some(post) = next else { break };
            self.answer(post, 0, Vec::new(), Some("manager dropped".to_owned()));
        }
        // SAFETY: `self.raw` is the live manager created in `new`, destroyed once;
        // `self.state` is dropped only after this.
        unsafe {
            ffi::lime_ffi_manager_destroy(self.raw);
        }
    }
}

/// The output of one encryption.
#[derive(Clone, Debug)]
pub struct Encrypted {
    /// The message all recipients share (empty with the DR-message policy).
    pub cipher_message: Vec<u8>,
    /// One Double Ratchet message per recipient, in request order.
    pub messages: Vec<RecipientMessage>,
}

impl Encrypted {
    /// The DR message for `device_id`, or an error naming what liblime said of it.
    pub fn dr_message_for(&self, device_id: &str) -> Result<&[u8]> {
        let message = self
            .messages
            .iter()
            .find(|message| message.device_id == device_id)
            .with_context(|| format!("no recipient entry for {device_id}"))?;
        ensure!(
            message.status != PeerDeviceStatus::Fail && !message.dr_message.is_empty(),
            "liblime could not encrypt to {device_id} (status {:?}, {} byte DR message)",
            message.status,
            message.dr_message.len()
        );
        Ok(&message.dr_message)
    }
}

/// What one recipient device gets.
#[derive(Clone, Debug)]
pub struct RecipientMessage {
    /// The recipient device (GRUU).
    pub device_id: String,
    /// What liblime says of that device after encrypting (`Fail`: no message).
    pub status: PeerDeviceStatus,
    /// The Double Ratchet message for that device.
    pub dr_message: Vec<u8>,
}

/// The output of one decryption.
#[derive(Clone, Debug)]
pub struct Decrypted {
    /// The sender's plaintext.
    pub plaintext: Vec<u8>,
    /// What liblime says of the sender device.
    pub sender_status: PeerDeviceStatus,
}

/// One local user on its own liblime manager and database.
pub struct LimeDevice {
    /// The device id (GRUU) liblime registers on the server.
    pub device_id: String,
    /// The base algorithm of this user.
    pub curve: Curve,
    /// The manager holding this user.
    pub manager: LimeManager,
}

impl LimeDevice {
    /// Creates a manager with database `db` and registers a new user on it.
    pub async fn create(
        db: &Path,
        client: LimeClient,
        server_url: &str,
        device_id: String,
        curve: Curve,
        opk_initial_batch: u16,
    ) -> Result<LimeDevice> {
        let mut manager = LimeManager::new(db, client)?;
        manager
            .create_user(&device_id, server_url, curve, opk_initial_batch)
            .await?;
        Ok(LimeDevice {
            device_id,
            curve,
            manager,
        })
    }

    /// Encrypts `plaintext` to `recipients` (device ids) for `recipient_user_id`.
    pub async fn encrypt(
        &mut self,
        recipient_user_id: &str,
        recipients: &[&str],
        plaintext: &[u8],
        policy: EncryptionPolicy,
    ) -> Result<Encrypted> {
        self.manager
            .encrypt(
                &self.device_id,
                self.curve,
                recipient_user_id,
                recipients,
                plaintext,
                policy,
            )
            .await
    }

    /// Decrypts what `sender` encrypted to this device.
    pub fn decrypt(
        &mut self,
        recipient_user_id: &str,
        sender: &str,
        dr_message: &[u8],
        cipher_message: &[u8],
    ) -> Result<Decrypted> {
        self.manager.decrypt(
            &self.device_id,
            recipient_user_id,
            sender,
            dr_message,
            cipher_message,
        )
    }

    /// Runs liblime's update (see [`LimeManager::update`]).
    pub async fn update(&mut self, opk_server_low_limit: u16, opk_batch_size: u16) -> Result<()> {
        self.manager
            .update(opk_server_low_limit, opk_batch_size)
            .await
    }

    /// Forgets peer device `device_id` locally: the next encryption to it fetches
    /// its key bundle again (see [`LimeManager::delete_peer_device`]).
    pub fn delete_peer_device(&mut self, device_id: &str) -> Result<()> {
        self.manager.delete_peer_device(device_id)
    }

    /// Deletes this user locally and on the server.
    pub async fn delete(&mut self) -> Result<()> {
        self.manager.delete_user(&self.device_id).await
    }

    /// This device's public identity key.
    pub fn identity_key(&self) -> Result<Vec<u8>> {
        self.manager.self_identity_key(&self.device_id)
    }
}
