"""Fake (meta) kernels of every lxt_ext op (``torch.library.register_fake``): output shapes, dtypes and
devices without computing anything."""
