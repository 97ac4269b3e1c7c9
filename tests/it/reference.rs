//! Model outputs against the reference implementation (filled in below).
