"""AdaFlow: keyframe selection (AKS), DDIM inversion, the keyframe pass (extended attention, AAS, PnP), propagation, pass-by-pass sampling."""
