"""Analyses on cached embeddings, each a function returning data (numpy arrays, dataclasses, dict rows).

- `audit`: near-duplicates and cross-split leakage, byte-identical files, likely label
  errors (cleanlab on out-of-fold probabilities), confusion structure; CSV, PNG, markdown.
- `similar`: the cached images most similar to query images (exact blocked search, or faiss).
- `embedding_map` (files) / `compute_map` (coordinates only): a 2-D map (t-SNE, PCA or UMAP) coloured by class.

Importing this package loads numpy, never scikit-learn or Keras (the CLI imports it for its --help);
scikit-learn, cleanlab, faiss and umap-learn are imported by the analysis that needs them.
"""

from tlfeat.analysis.audit import AuditResult, audit
from tlfeat.analysis.duplicates import DuplicatePair, Duplicates, choose_threshold, find_duplicates
from tlfeat.analysis.label_issues import LabelIssue, LabelReview, confused_pairs, review_labels
from tlfeat.analysis.maps import EmbeddingMap, MapResult, compute_map, embedding_map
from tlfeat.analysis.search import Neighbours, exact_top_k
from tlfeat.analysis.similar import SimilarResult, similar

__all__ = [
    "AuditResult", "DuplicatePair", "Duplicates", "EmbeddingMap", "LabelIssue", "LabelReview", "MapResult",
    "Neighbours", "SimilarResult", "audit", "choose_threshold", "compute_map", "confused_pairs", "embedding_map",
    "exact_top_k", "find_duplicates", "review_labels", "similar",
]
