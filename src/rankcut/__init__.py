"""rankcut: data-aware low-rank compression of Hugging Face causal LMs with global rank allocation.

    import rankcut
    model, tokenizer = rankcut.load_model("smollm2-135m")
    model, report = rankcut.compress(model, rankcut.CompressionConfig(keep_ratio=0.8), tokenizer=tokenizer)
    rankcut.save(model, tokenizer, "out", report)
    model, tokenizer = rankcut.load("out")   # or AutoModelForCausalLM.from_pretrained("out")
"""

from . import artifacts  # registers the "rankcut" format with transformers' from_pretrained
from .allocation import ALLOCATORS, Allocation, AllocationContext, Allocator, create_allocator
from .api import save
from .artifacts import load, verify_artifact
from .compress import CalibrationConfig, CompressionConfig, CompressionReport, compress, compress_checkpoint
from .data import TextCorpus, load_text, sample_calibration
from .errors import RankcutError
from .evaluation.perplexity import PerplexityResult, evaluate_perplexity
from .models import BUNDLED, load_model
from .plan import Budget, RankPlan
from .targets import TargetModule, find_targets
from .whitening import WHITENERS

__version__ = "0.1.0"

__all__ = [
    "ALLOCATORS", "Allocation", "AllocationContext", "Allocator", "BUNDLED", "Budget", "CalibrationConfig",
    "CompressionConfig", "CompressionReport", "PerplexityResult", "RankPlan", "RankcutError", "TargetModule",
    "TextCorpus", "WHITENERS", "compress", "compress_checkpoint", "create_allocator", "evaluate_perplexity", "find_targets", "load",
    "load_model", "load_text", "sample_calibration", "save", "verify_artifact",
]
