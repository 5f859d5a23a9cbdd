//! Table-driven routing cases (request → expected backend / status / headers / Location).
