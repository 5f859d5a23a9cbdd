//! metrics (placeholder; being written)
