"""dg_quantize: weight-only int8 / int4 quantization of DiffusionGemma artifacts, by tensor role, and the quality
report that measures what it costs against the fp32 graphs."""
