"""``harness viz``: pictures of dense features, one column per method, as in PH-Reg's figures.

PH-Reg (Chen et al., "Vision Transformers with Self-Distilled Registers", NeurIPS 2025, arXiv:2505.21501)
compares methods in Fig. 1 and Fig. 4 by showing, per image and per method, a colour projection of the
dense features and a heatmap of one text query. ``harness viz`` draws those rows plus a per-token norm
heatmap (where artifact tokens show up) and, for CLIP ids, the predicted segmentation over a name set:

* :mod:`.features` -- images read at a fixed resolution and the dense features of every method;
* :mod:`.projection` -- one PCA (or UMAP) fitted jointly over all methods and images, so colours compare;
* :mod:`.text` -- the query heatmap and the argmax segmentation;
* :mod:`.figure` -- one PNG per image (matplotlib, Agg canvas);
* :mod:`.page` -- ``index.html`` that shows them all;
* :mod:`.render` -- the whole run, used by the CLI and the demo.
"""
