//! `switchyard demo` (filled in below).
use crate::error::{Error, Result};
pub fn run() -> Result<i32> {
    Err(Error::unavailable("demo: not built yet"))
}
