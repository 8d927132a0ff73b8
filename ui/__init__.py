"""The patient-facing web app (Gradio), its own process: it talks to the Attune API over HTTP like any other
client and never sees model, adapter or objective internals. Start it with `attune ui`."""
