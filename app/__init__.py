"""EditLab's Gradio app: the page (`build_demo`) over editcore's GUI-free Lab."""
from .ui import Handlers, build_demo, launch

__all__ = ["Handlers", "build_demo", "launch"]
