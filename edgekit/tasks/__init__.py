"""Task metrics: detection decoders, NMS, ground-truth readers, COCO mAP and segmentation mIoU.

Modules: types (Boxes), decoders (raw outputs -> candidate boxes), nms, labels (YOLO txt, COCO JSON, class
names), coco (mAP50-95 via pycocotools), segment (class-index masks, confusion matrix, mIoU). numpy only, no
torch; nothing is imported here so that `import edgekit.tasks.nms` stays light.
"""
