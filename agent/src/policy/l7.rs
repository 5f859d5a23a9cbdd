//! Placeholder: L7 AuthorizationPolicy for waypoints (issue 5).
