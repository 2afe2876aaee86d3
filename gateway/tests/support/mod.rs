//! Test support for the gateway's end-to-end tests: the shared fleet harness of `switchyard-testkit`, re-exported so
//! each test names it as `support`. It adds nothing of its own and starts nothing by itself.

#![allow(unused_imports)]

pub use switchyard_testkit::*;
