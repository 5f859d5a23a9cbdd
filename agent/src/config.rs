//! config (placeholder; being written)
