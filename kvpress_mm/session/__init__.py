"""The compressor session: the hooks that compress a model's KV cache inside a ``with`` block.

``compressor(model)`` returns a :class:`CompressionSession`. Its parts, one concern each:

- :mod:`~kvpress_mm.session.context`: the context manager itself (enter, exit, the hooks) and
  its :class:`CompressionReport`;
- :mod:`~kvpress_mm.session.attention`: the attention wrapper registered with transformers,
  and when the session may compute a prefill attention itself;
- :mod:`~kvpress_mm.session.calls`: what each model call brings, and the checks that refuse
  calls that would go wrong on a compressed cache (continuations);
- :mod:`~kvpress_mm.session.generation`: what the session changes in ``generate``'s own steps
  (chunked prefill refused, a whole-history continuation cut at the right column, assisted
  decoding's first round and assistants);
- :mod:`~kvpress_mm.session.prefill`: a layer's plan right after its prompt attention;
- :mod:`~kvpress_mm.session.decode`: attention on a compressed layer, with the mask the
  session owns, and decode-time eviction;
- :mod:`~kvpress_mm.session.state`: what the session keeps about a compressed cache, and how it
  follows the cache's edits (beam search's row changes, assisted decoding's ``crop``).
"""

from kvpress_mm.session.context import CompressionReport, CompressionSession

__all__ = ["CompressionReport", "CompressionSession"]
