# One agent on every GPU client (a system job). Nomad's NVIDIA device plugin reserves the
# GPUs and names them in NVIDIA_VISIBLE_DEVICES; the agent uses exactly those (by UUID)
# and gives engines CUDA_VISIBLE_DEVICES indices in PCI bus order. Engines are the agent's
# children: the exec driver's cgroup holds them, and a restarted agent adopts them
# (the task's kill_signal is SIGTERM; the agent leaves its engines serving).
job "flotilla-agents" {
  type = "system"

  constraint {
    attribute = "${meta.flotilla_gpu_node}"
    value     = "true"
  }

  group "agent" {
    task "agent" {
      driver = "exec"
      config {
        command = "/usr/local/bin/flotilla"
        args    = ["agent", "--config", "${NOMAD_TASK_DIR}/agent.toml"]
      }
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"
      template {
        destination = "${NOMAD_TASK_DIR}/agent.toml"
        data        = <<-EOT
          server = "{{ range $i, $s := nomadService `flotilla-server` }}{{ if $i }},{{ end }}{{ $s.Address }}:7070{{ end }}"
          node_name = "{{ env `node.unique.name` }}"
          data_dir = "/var/lib/flotilla/agent"
          address = "{{ env `attr.unique.network.ip-address` }}"
          nvidia = true
          tls_cert = "/etc/flotilla/tls/agent.pem"
          tls_key = "/etc/flotilla/tls/agent-key.pem"
          tls_ca = "/etc/flotilla/tls/ca.pem"
        EOT
      }
      resources {
        cpu    = 2000
        memory = 1024
        device "nvidia/gpu" {
          count = 8
        }
      }
    }
  }
}
