//! crd (placeholder; being written)
