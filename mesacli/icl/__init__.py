"""Few-shot in-context regression with a frozen next-token model (paper-spec section 5; paper Fig. 8/18, F.1.4).

``mesacli icl-eval`` measures how well a trained run regresses y_i = W* x_i from the (x, y) examples earlier in a
prompt, next to closed-form baselines; ``mesacli prompt-tune`` learns an EOS token and a prompt prefix for it.

Modules, each importing only the ones above it (evaluate and tune never import each other):

- ``prompts``:   randomness streams (``icl_key``), the prompt layout, building prompts, sampling the (x, y) data,
                 the frozen model's per-example label loss;
- ``baselines``: autoregressive ridge LSQ, ridge LSQ and one-step GD (``gd1_xy_direction``) on the (x, y) pairs;
- ``tokens``:    where prompt-tune keeps the tuned tokens (RUN/prompt_tune/[seed<k>/]<stage>/), their checkpoint
                 metadata, ``load_tuned`` and the check that they were tuned on the evaluated model checkpoint;
- ``evaluate``:  ``icl_eval`` and its report (JSON + figure);
- ``tune``:      ``prompt_tune`` / ``tune_stage``: Adam on the tokens in the guarded loop of ``mesacli.loop``.
"""
