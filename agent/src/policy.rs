//! L4 policy (placeholder being replaced by the policy work).

#[derive(Debug, Default)]
pub struct Policies {}
