"""Web UI panels. Each panel builds its Gradio widgets and exposes plain handler functions that only call the
service, so they are testable without a browser."""
