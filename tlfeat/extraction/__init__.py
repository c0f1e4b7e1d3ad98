"""Extraction: a resumable, incremental run (`run`) over an engine that computes the features (`engines`)."""
