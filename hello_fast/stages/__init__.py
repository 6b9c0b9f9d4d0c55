"""The four HeLlO stages plus teachers and the report: each reads and writes one run directory."""
