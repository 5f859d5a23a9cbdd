//! Network-namespace harness for weft's end-to-end tests.
