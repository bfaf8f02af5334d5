//! Reading protobuf wire format in place, for the two hot ingress paths (the Check and
//! the access log) that must not materialize whole prost messages.
//!
//! A [`Reader`] walks the fields of one message and lends out length-delimited bytes
//! without copying. It never trusts a length: a field that claims more bytes than the
//! message has is [`Malformed`], with the offset where it starts.

/// Wire types (protobuf encoding spec).
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Nesting of (deprecated) groups skipped inside one message; prost allows 100 levels
/// of recursion in all.
const MAX_GROUP_DEPTH: usize = 100;

/// The bytes do not follow the protobuf encoding. `offset` is where the field that
/// broke it starts, counted from the start of the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed {
    pub offset: usize,
}

/// The value of one field, as far as the wire format says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireValue<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8]),
    /// A (deprecated) group: skipped whole, never read.
    Group,
}

impl<'a> WireValue<'a> {
    /// The bytes of a length-delimited field.
    pub fn bytes(self) -> Option<&'a [u8]> {
        match self {
            WireValue::Len(b) => Some(b),
            _ => None,
        }
    }

    /// A varint field's value.
    pub fn varint(self) -> Option<u64> {
        match self {
            WireValue::Varint(v) => Some(v),
            _ => None,
        }
    }
}

/// Walks the fields of one encoded message.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// Offset of the next field from the start of the buffer.
    pub fn offset(&self) -> usize {
        self.pos
    }

    fn varint_at(&mut self, start: usize) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for i in 0..10 {
            let &b = self.buf.get(self.pos).ok_or(Malformed { offset: start })?;
            self.pos += 1;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(value);
            }
        }
        Err(Malformed { offset: start })
    }

    fn take(&mut self, n: u64, start: usize) -> Result<&'a [u8], Malformed> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.buf.len())
            .ok_or(Malformed { offset: start })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// The next field's number and wire type, or `None` at the end.
    fn key(&mut self, start: usize) -> Result<Option<(u32, u8)>, Malformed> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint_at(start)?;
        let number = u32::try_from(key >> 3)
            .ok()
            .filter(|&n| n != 0)
            .ok_or(Malformed { offset: start })?;
        Ok(Some((number, (key & 7) as u8)))
    }

    /// The next field: its number and value.
    pub fn field(&mut self) -> Result<Option<(u32, WireValue<'a>)>, Malformed> {
        let start = self.pos;
        let Some((number, wire)) = self.key(start)? else {
            return Ok(None);
        };
        let value = match wire {
            VARINT => WireValue::Varint(self.varint_at(start)?),
            FIXED64 => {
                let b = self.take(8, start)?;
                WireValue::Fixed64(u64::from_le_bytes(b.try_into().unwrap_or_default()))
            }
            LEN => {
                let n = self.varint_at(start)?;
                WireValue::Len(self.take(n, start)?)
            }
            FIXED32 => {
                let b = self.take(4, start)?;
                WireValue::Fixed32(u32::from_le_bytes(b.try_into().unwrap_or_default()))
            }
            START_GROUP => {
                self.skip_group(number, start)?;
                WireValue::Group
            }
            _ => return Err(Malformed { offset: start }),
        };
        Ok(Some((number, value)))
    }

    /// Skips to the end of the group `number` that just started.
    fn skip_group(&mut self, number: u32, start: usize) -> Result<(), Malformed> {
        let mut open = vec![number];
        while let Some(&innermost) = open.last() {
            if open.len() > MAX_GROUP_DEPTH {
                return Err(Malformed { offset: start });
            }
            let at = self.pos;
            let (n, wire) = self.key(at)?.ok_or(Malformed { offset: start })?;
            match wire {
                START_GROUP => open.push(n),
                END_GROUP if n == innermost => {
                    open.pop();
                }
                END_GROUP => return Err(Malformed { offset: at }),
                VARINT => {
                    self.varint_at(at)?;
                }
                FIXED64 => {
                    self.take(8, at)?;
                }
                LEN => {
                    let len = self.varint_at(at)?;
                    self.take(len, at)?;
                }
                FIXED32 => {
                    self.take(4, at)?;
                }
                _ => return Err(Malformed { offset: at }),
            }
        }
        Ok(())
    }
}

/// Calls `f` with the number and value of every field of `buf`, in order.
pub fn each_field<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(u32, WireValue<'a>) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    let mut r = Reader::new(buf);
    while let Some((number, value)) = r.field()? {
        f(number, value)?;
    }
    Ok(())
}

/// Calls `f` with the number and bytes of every length-delimited field of `buf`.
pub fn each_len_field<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(u32, &'a [u8]) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    each_field(buf, |number, value| match value {
        WireValue::Len(bytes) => f(number, bytes),
        _ => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(buf: &[u8]) -> Result<Vec<(u32, WireValue<'_>)>, Malformed> {
        let mut out = Vec::new();
        each_field(buf, |n, v| {
            out.push((n, v));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn reads_every_wire_type() {
        let buf = [
            0x08, 0x96, 0x01, // 1: varint 150
            0x11, 1, 0, 0, 0, 0, 0, 0, 0, // 2: fixed64 1
            0x1a, 0x02, b'h', b'i', // 3: "hi"
            0x25, 2, 0, 0, 0, // 4: fixed32 2
            0x2b, 0x08, 0x01, 0x2c, // 5: group holding field 1, then its end
        ];
        assert_eq!(
            fields(&buf).unwrap(),
            vec![
                (1, WireValue::Varint(150)),
                (2, WireValue::Fixed64(1)),
                (3, WireValue::Len(b"hi")),
                (4, WireValue::Fixed32(2)),
                (5, WireValue::Group),
            ]
        );
    }

    #[test]
    fn broken_encodings_name_the_offset_of_the_field() {
        // A good field, then one that claims 5 bytes and has 1.
        assert_eq!(
            fields(&[0x08, 0x01, 0x12, 0x05, b'x']),
            Err(Malformed { offset: 2 })
        );
        assert_eq!(fields(&[0x00]), Err(Malformed { offset: 0 }), "field 0");
        assert_eq!(fields(&[0x0f]), Err(Malformed { offset: 0 }), "wire type 7");
        let mut eleven = vec![0x08];
        eleven.extend([0xff; 10]);
        eleven.push(0x01);
        assert_eq!(
            fields(&eleven),
            Err(Malformed { offset: 0 }),
            "11-byte varint"
        );
        assert_eq!(
            fields(&[0x2b, 0x08]),
            Err(Malformed { offset: 1 }),
            "cut in a group"
        );
        assert_eq!(
            fields(&[0x2b, 0x08, 0x01]),
            Err(Malformed { offset: 0 }),
            "group never closed"
        );
        assert_eq!(
            fields(&[0x2b, 0x34]),
            Err(Malformed { offset: 1 }),
            "wrong end"
        );
        assert_eq!(
            fields(&[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            Err(Malformed { offset: 0 }),
            "a length beyond usize"
        );
    }
}
