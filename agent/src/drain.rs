//! drain (placeholder; being written)
