"""QUIC endpoint, peer authentication, framing and NAT traversal (see DESIGN.md, "Transport")."""
