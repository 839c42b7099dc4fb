//! The C API, as declared in `/usr/include/lime/lime_ffi.h` (liblime 5.1).
//!
//! Declarations only; every call is wrapped in `super`, with its safety reasoning.

use std::ffi::{c_char, c_int, c_void};

/// `struct lime_manager_struct`, opaque.
#[repr(C)]
pub struct LimeManagerStruct {
    _opaque: [u8; 0],
}

/// `struct lime_ffi_data_struct`, opaque: liblime's handle on one pending post,
/// freed by `lime_ffi_processX3DHServerResponse`.
#[repr(C)]
pub struct LimeFfiDataStruct {
    _opaque: [u8; 0],
}

pub type LimeManagerT = *mut LimeManagerStruct;
pub type LimeFfiDataT = *mut LimeFfiDataStruct;

/// `LIME_FFI_SUCCESS`; the other return codes are negative.
pub const SUCCESS: c_int = 0;
/// `LIME_FFI_INTERNAL_ERROR`: liblime caught an exception and logged it.
pub const INTERNAL_ERROR: c_int = -2;
/// `LIME_FFI_USER_NOT_FOUND`.
pub const USER_NOT_FOUND: c_int = -4;
/// `lime_ffi_CallbackReturn_success` (`_fail` is 1).
pub const CALLBACK_SUCCESS: c_int = 0;

/// `lime_ffi_RecipientData_t`. C enums are `int` on this ABI.
#[repr(C)]
pub struct RecipientData {
    pub device_id: *mut c_char,
    pub peer_status: c_int,
    pub dr_message: *mut u8,
    pub dr_message_size: usize,
}

/// `lime_ffi_Callback`.
pub type StatusCallback = extern "C" fn(*mut c_void, c_int, *const c_char);
/// `lime_ffi_X3DHServerPostData`.
pub type PostCallback =
    extern "C" fn(*mut c_void, LimeFfiDataT, *const c_char, *const c_char, *const u8, usize);

#[link(name = "lime")]
unsafe extern "C" {
    pub fn lime_ffi_manager_init(
        manager: *mut LimeManagerT,
        db: *const c_char,
        x3dh_post_data: PostCallback,
        user_data: *mut c_void,
    ) -> c_int;
    pub fn lime_ffi_manager_destroy(manager: LimeManagerT) -> c_int;
    #[allow(non_snake_case)]
    pub fn lime_ffi_processX3DHServerResponse(
        lime_data: LimeFfiDataT,
        code: c_int,
        response: *const u8,
        response_size: usize,
    ) -> c_int;
    pub fn lime_ffi_create_user(
        manager: LimeManagerT,
        local_device_id: *const c_char,
        x3dh_server_url: *const c_char,
        curve: c_int,
        opk_initial_batch_size: u16,
        callback: StatusCallback,
        callback_user_data: *mut c_void,
    ) -> c_int;
    pub fn lime_ffi_delete_user(
        manager: LimeManagerT,
        local_device_id: *const c_char,
        callback: StatusCallback,
        callback_user_data: *mut c_void,
    ) -> c_int;
    pub fn lime_ffi_is_user(manager: LimeManagerT, local_device_id: *const c_char) -> c_int;
    #[allow(non_snake_case)]
    pub fn lime_ffi_delete_peerDevice(
        manager: LimeManagerT,
        peer_device_id: *const c_char,
    ) -> c_int;
    #[allow(non_snake_case)]
    pub fn lime_ffi_encryptOutBuffersMaximumSize(
        plain_message_size: usize,
        curve: c_int,
        dr_message_size: *mut usize,
        cipher_message_size: *mut usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn lime_ffi_encrypt(
        manager: LimeManagerT,
        local_device_id: *const c_char,
        recipient_user_id: *const c_char,
        recipients: *mut RecipientData,
        recipients_size: usize,
        plain_message: *const u8,
        plain_message_size: usize,
        cipher_message: *mut u8,
        cipher_message_size: *mut usize,
        callback: StatusCallback,
        callback_user_data: *mut c_void,
        encryption_policy: c_int,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn lime_ffi_decrypt(
        manager: LimeManagerT,
        local_device_id: *const c_char,
        recipient_user_id: *const c_char,
        sender_device_id: *const c_char,
        dr_message: *const u8,
        dr_message_size: usize,
        cipher_message: *const u8,
        cipher_message_size: usize,
        plain_message: *mut u8,
        plain_message_size: *mut usize,
    ) -> c_int;
    pub fn lime_ffi_update(
        manager: LimeManagerT,
        callback: StatusCallback,
        callback_user_data: *mut c_void,
        opk_server_low_limit: u16,
        opk_batch_size: u16,
    ) -> c_int;
    #[allow(non_snake_case)]
    pub fn lime_ffi_get_selfIdentityKey(
        manager: LimeManagerT,
        local_device_id: *const c_char,
        ik: *mut u8,
        ik_size: *mut usize,
    ) -> c_int;
}
