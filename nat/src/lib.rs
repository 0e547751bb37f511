//! switchyard's gateway and connection-tracking NAT. Pure logic: time is an argument.
