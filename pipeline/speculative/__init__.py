"""Speculative decoding: cached target and draft, proposers, the loop, the naive oracle, teacher generation."""
