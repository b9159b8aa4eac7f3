"""`mm-llama eval`: held-out suites that show what each trained stage learned (`tasks.py`: what is asked; `runner.py`:
asking it and the report)."""
