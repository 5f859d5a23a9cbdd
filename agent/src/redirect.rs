//! redirect (placeholder; being written)
