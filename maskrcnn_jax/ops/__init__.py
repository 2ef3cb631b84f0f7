"""Pure, jit-able detection ops without parameters (boxes, anchors, matching, sampling, NMS,
RoIAlign, mask targets and pasting, losses). Static shapes throughout; float32 arithmetic."""
