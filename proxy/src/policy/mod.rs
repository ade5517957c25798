//! The authorization policy engine (stub).
