//! `svidcar init`: interception rules (stub).
