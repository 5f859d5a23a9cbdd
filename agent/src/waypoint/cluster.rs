//! Placeholder: filled in by the waypoint work (issue 5).
