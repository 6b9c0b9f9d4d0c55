"""The stages (teachers, select, projector, refine, student), each declaring a `Stage` (contract.py), and the report."""
