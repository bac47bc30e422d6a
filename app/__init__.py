"""The Gradio app over dfusion_core: wiring, state and views only."""
