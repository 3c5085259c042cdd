"""Gradio app: arrives with the app issue; the engine is usable today through the CLI."""

raise SystemExit("The web app is not built yet; use `python -m merge_core --help`.")
