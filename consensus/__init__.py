"""The four proofs and the BFT engine, all sans-IO (see DESIGN.md, "Consensus")."""
