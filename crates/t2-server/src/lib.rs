//! (server: issue 3)
