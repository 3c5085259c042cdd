"""GGUF export of a merged model (for llama.cpp, Ollama, LM Studio) and its verification rows."""

from merge_core.gguf_export.arch import supported_architectures
from merge_core.gguf_export.export import GGUF_TYPES, GgufReport, export_gguf, preflight_gguf
from merge_core.gguf_export.verify import verify_gguf

__all__ = ["GGUF_TYPES", "GgufReport", "export_gguf", "preflight_gguf", "supported_architectures", "verify_gguf"]
