"Multi-task learning for few-shot image classification."
