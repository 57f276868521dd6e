"""servekit: the TorchServe-free core of the kit's vision handlers (decode, transforms, postprocess, config)."""
