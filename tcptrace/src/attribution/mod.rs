//! Pod attribution: netns / cgroup / socket owner -> pod, Service.
