"""The applications on top of the library: ``timm-dec demo`` (`demo`, its `presets`, `demo_report`, `plots`),
``timm-dec eval`` (`evaluate`), ``timm-dec segment`` (`segment`), ``timm-dec push`` (`push`, over `timm_dec.hub`),
fine-tuning (`finetune`, also ``python -m timm_dec.finetune``) and the digit heads they share (`heads`).

Nothing in the library (`timm_dec.ops`, `~.solver`, `~.dec`, `~.models`, `~.adapt`) or the I/O modules imports from
here; importing this package imports none of the applications.
"""
