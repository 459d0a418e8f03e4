"""The sentence-embedding methods of the literature, as plain tensor and array code: pooling over
chosen tokens and heads (pooling), hidden states and layer averaging from a forward pass
(extraction), prompts and PromptEOL templates (prompts), post-processing steps and their fits:
whitening, ABTT, z-score, normalisation (postprocess).

May import: nothing of the product (numpy, torch, safetensors only). Everything else builds on it.
"""
