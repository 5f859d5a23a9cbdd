//! discovery (placeholder; being written)
