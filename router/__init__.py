"""Omnirouter core: the message model, pipeline, classifier, scheduler, store and daemon."""

__version__ = "0.1.0"
