//! The node identity agent (stub).
