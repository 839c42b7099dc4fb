//! A bounds-checked cursor over a message body: every read names the field it reads,
//! so a short message says where it ends.

use crate::ParseErrorKind;

pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn bytes(
        &mut self,
        len: usize,
        field: &'static str,
    ) -> Result<&'a [u8], ParseErrorKind> {
        if self.rest.len() < len {
            return Err(ParseErrorKind::Truncated(field));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    pub(crate) fn vec(
        &mut self,
        len: usize,
        field: &'static str,
    ) -> Result<Vec<u8>, ParseErrorKind> {
        self.bytes(len, field).map(<[u8]>::to_vec)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, ParseErrorKind> {
        Ok(self.bytes(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, ParseErrorKind> {
        let bytes = self.bytes(2, field)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, ParseErrorKind> {
        let bytes = self.bytes(4, field)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Checks that exactly `count` records of `record_len` bytes remain, before
    /// anything is allocated for them.
    pub(crate) fn expect_records(
        &self,
        count: u16,
        record_len: usize,
        field: &'static str,
    ) -> Result<(), ParseErrorKind> {
        let needed = usize::from(count) * record_len;
        match self.rest.len() {
            len if len < needed => Err(ParseErrorKind::Truncated(field)),
            len if len > needed => Err(ParseErrorKind::TrailingBytes(len - needed)),
            _ => Ok(()),
        }
    }

    /// The message must end here.
    pub(crate) fn finish(self) -> Result<(), ParseErrorKind> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(ParseErrorKind::TrailingBytes(extra)),
        }
    }

    /// Everything left, which ends the message.
    pub(crate) fn rest(self) -> &'a [u8] {
        self.rest
    }
}
