"""Export: RobustBench layout (weights, model_info JSON, model-zoo entry), safetensors, model cards.

Every loader here reads safetensors or ``torch.load(weights_only=True)``; nothing is unpickled.
"""
from .citations import METHOD_INFO, OBJECTIVE_INFO, method_citations, method_label
from .model_card import card_context, render_model_card
from .robustbench_export import default_name, export_run, load_exported, read_pt_state_dict

__all__ = ["export_run", "load_exported", "default_name", "read_pt_state_dict", "render_model_card",
           "card_context", "method_label", "method_citations", "METHOD_INFO", "OBJECTIVE_INFO"]
