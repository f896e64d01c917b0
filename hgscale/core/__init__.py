"""Foundations every layer may import, that import nothing else of hgscale (and neither torch nor deepspeed):
exit statuses and error kinds (``status``), secret masking (``secrets``), the hierarchy notation
(``notation``), named model sizes (``presets``), the learning-rate schedule (``schedule``), storage over fsspec
(``storage``) and a free port (``net``)."""
